"""The RaFFM ServerApp and strategy (Flower Message API)."""
