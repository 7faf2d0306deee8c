print('gist_generate')
