"""JetStream layout: names (`jetstream.subjects`), definitions (JSON files
beside this module) and the code that applies them (`jetstream.setup`)."""
