"""Backend adapters: one module per server kind, each turning HTTP answers into pool facts."""
