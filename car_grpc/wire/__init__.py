"""What the gateway, the core and the dashboard share about the wire, and nothing else:
the method table read off the descriptors (`api`), the JSON ⇄ proto mapping (`codec`),
the one error model (`errors`) and the message limits (`limits`). It depends only on the
generated code, so importing the gateway or the dashboard never loads the core or the
store."""
