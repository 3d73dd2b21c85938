"""Names the data (conversation.py) and the model (vlm.py) share, so that neither imports the other."""
IMAGE_TOKEN = "<image>"  # the placeholder in LLaVA's data
IMAGE_SLOT = -200  # input id of a visual-token position (LLaVA's IMAGE_TOKEN_INDEX)
IGNORE = -100  # label of a position that carries no loss (cross_entropy's ignore_index)
