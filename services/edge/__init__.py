"""The edge: WebSocket sessions in, utterance segments out to JetStream."""
