print('gist_lora_distributed')
