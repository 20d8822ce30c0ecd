"""The local consortium demo: synthetic hospitals, a coordinator, federated DP-LoRA rounds, end to end."""
