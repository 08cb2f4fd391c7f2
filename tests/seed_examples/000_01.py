# Example 1 from 000_2bf5e6a296c248af.txt, as written there (interactive prompts removed).
# maestrale copy: `transformers` -> `maestrale`, config shrunk (the defaults build billions of parameters).
from maestrale import MinistralModel, MinistralConfig
# Initializing a Ministral 8B style configuration
configuration = MinistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# Initializing a model from the Ministral 8B style configuration
model = MinistralModel(configuration)
# Accessing the model configuration
configuration = model.config
