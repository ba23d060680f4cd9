"""The controller: registry of workers, dispatch policies, and FastChat's controller endpoints."""
