"""The embedded runtime: `escapement up`, the nats-server it runs, and the process toolkit."""
