"""secfed on Flower: the ServerApp and ClientApp of this example app."""
