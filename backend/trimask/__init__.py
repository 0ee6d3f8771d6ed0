"""trimask: interactive annotation with Segment Anything."""
