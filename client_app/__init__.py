"""The RaFFM ClientApp (Flower Message API)."""
