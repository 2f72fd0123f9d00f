-- Claiming a row updates only unindexed columns (lease, attempts); with room
-- left on each page those updates are HOT and leave no dead index entries
-- for the next claim to scan past.
ALTER TABLE authz_outbox SET (fillfactor = 70);
