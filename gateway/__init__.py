"""The gateway service and the client side: submit, watch, status."""
