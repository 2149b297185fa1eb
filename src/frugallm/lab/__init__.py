"""``frugallm lab``: DeepSeek's efficiency claims re-measured at small scale (issue #25). Uses train, serve and
cost; nothing uses lab."""
