"""Following the log: subscriptions (`tamma_events.streaming.subscriptions`), the store's LISTEN
connection (`tamma_events.streaming.listen_async`, and `listen` generated from it), and the HTTP
app that serves them as server-sent events (`tamma_events.streaming.web`)."""
