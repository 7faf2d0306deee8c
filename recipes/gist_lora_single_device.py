print('gist_lora_single_device')
