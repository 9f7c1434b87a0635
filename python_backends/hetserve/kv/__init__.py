"""The KV interchange format, its engine-layout converters and its buffers."""
