"""Command line: rebuild the Alpaca+ training split (:func:`torchtune_gist.data.build_alpaca_plus_train`).

``python -m torchtune_gist.data.alpaca_plus --alpaca alpaca_data.json \\
--self-instruct all_instances_82K.jsonl --out DIR``
"""

from torchtune_gist.data._alpaca_plus import main

if __name__ == "__main__":
    main()
