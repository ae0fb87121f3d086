-- Tag values of one key, by prefix and in pages (`get_tag_values`): the summary's rows of a key
-- in the order of their values' first 200 characters, bytewise (collation "C"), then digest.
-- A prefix of the value, not the value: an index entry must stay far under btree's limit, and a
-- tag value may be far longer. A page is a range scan of this index that stops at its size,
-- whatever the number of values the key has.
CREATE INDEX tag_summary_key_value
    ON tag_summary (key, (substr(value, 1, 200)) COLLATE "C", digest);
