"""The model worker: one model behind FastChat's worker endpoints, registered with controllers."""
