"""The keys of the flows' Prefect artifacts: one place for the flows that create them and the
demo and tools that read them back (a renamed key would otherwise break them silently).

Prefect keeps every run's artifact under its key, newest first, so a key names a kind of
report, not one run's."""

DEPTH_SUMMARY = "depth-extraction-summary"
DEPTH_VIDEOS = "depth-extraction-videos"
DEPTH_FAILURES = "depth-extraction-failures"
DEPTH_PROGRESS = "depth-extraction-progress"
STREAM_LATENCY = "stream-benchmark-latency"
STREAM_REPORT = "stream-benchmark-report"
CAPACITY_TABLE = "stream-capacity-sweep"
CAPACITY_REPORT = "stream-capacity-report"
