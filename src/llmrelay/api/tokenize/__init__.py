"""POST /tokenize and /detokenize (vLLM's and llama.cpp's shape): request and response types
(protocol.py), serving (serving.py)."""
