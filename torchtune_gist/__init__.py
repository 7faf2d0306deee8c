"""torchtune-gist."""
