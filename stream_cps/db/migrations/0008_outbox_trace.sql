-- The W3C traceparent of the span whose transaction wrote the command (a stitching batch or
-- an attribute batch), so the relay's delivery span links back to it and a change can be
-- followed from its event to OpenSearch. NULL when that process did not trace.
ALTER TABLE {attr}.outbox ADD COLUMN IF NOT EXISTS traceparent text NULL;
