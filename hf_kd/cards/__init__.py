"""Cards: the markdown and Hub metadata that describe what hf_kd made (``dataset``: a teacher cache's
dataset card)."""
