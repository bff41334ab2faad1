-- Sample CDP configuration for `stream-cps demo` and the benchmarks: a web site, a shop and a
-- CRM, their stitching rules (the guide's format) and a few attribute definitions.
INSERT INTO {cdp}.sources (id, name) VALUES
    ('web', 'Web'), ('shop', 'Shop'), ('crm', 'CRM')
ON CONFLICT DO NOTHING;

INSERT INTO {cdp}.events (id, source_id, type, version, name) VALUES
    ('web_page_view', 'web', 'page_view', '1-0-0', 'Page view'),
    ('web_login', 'web', 'login', '1-0-0', 'Login'),
    ('shop_purchase', 'shop', 'purchase', '1-0-0', 'Purchase'),
    ('crm_update', 'crm', 'contact_update', '1-0-0', 'CRM contact update')
ON CONFLICT DO NOTHING;

INSERT INTO {cdp}.attributes (id, name, data_type, definition) VALUES
    ('stitching_meiro_id', '1PT Meiro Web ID', 'string', NULL),
    ('stitching_email', 'Email', 'string', NULL),
    ('stitching_phone', 'Phone', 'string', NULL),
    ('stitching_user_id', 'Web user id', 'string', NULL),
    ('stitching_crm_id', 'CRM id', 'string', NULL),
    ('emails', 'Emails', 'string',
     '{{"type": "list", "value": "lower(trim(payload->>''email''))", "outer_filter": "value LIKE ''%@%''"}}'),
    ('total_spent', 'Total spent', 'float',
     '{{"type": "sum", "sources": ["shop"], "types": ["purchase"], "value": "(payload->>''total'')::numeric"}}'),
    ('favourite_product', 'Favourite product', 'string',
     '{{"type": "most_frequent", "sources": ["shop"], "value": "payload->>''product''"}}'),
    ('first_seen', 'First seen', 'datetime',
     '{{"type": "first", "value": "event_time"}}'),
    ('last_purchase', 'Last purchase', 'datetime',
     '{{"type": "last", "types": ["purchase"], "value": "event_time"}}'),
    ('page_views', 'Page views', 'int',
     '{{"type": "custom", "query": "SELECT count(*) AS value FROM base WHERE type = ''page_view''"}}')
ON CONFLICT DO NOTHING;

INSERT INTO {ps}.stitching_attributes_config (attribute_id, event_id, value_expression) VALUES
    ('stitching_meiro_id', 'web_page_view',
     'json_array_elements_text(json_build_array(payload->>''cookie_id'', payload->''inbound_user_ids''->>0))'),
    ('stitching_meiro_id', 'web_login', 'payload->>''cookie_id'''),
    ('stitching_user_id', 'web_login', 'payload->>''user_id'''),
    ('stitching_email', 'web_login', 'payload->>''email'''),
    ('stitching_email', 'shop_purchase', 'payload->>''email'''),
    ('stitching_phone', 'shop_purchase', 'payload->>''phone'''),
    ('stitching_crm_id', 'crm_update', 'payload->>''crm_id'''),
    ('stitching_email', 'crm_update', 'payload->>''email'''),
    ('stitching_phone', 'crm_update', 'payload->>''phone''')
ON CONFLICT DO NOTHING;
