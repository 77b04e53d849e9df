-- Per-worker credentials (decision record 0010). `credential_generation`: the generation of
-- the worker's current credential, 0 while none was issued (a worker registered before this
-- migration registers once more with the join token and gets one). `credential_previous_ok`:
-- after a rotation, the previous generation still works until the worker uses the new one.
-- `credential_join_ok`: an admin reset the credential; the next registration of this name may
-- use the shared join token.
ALTER TABLE workers ADD COLUMN credential_generation INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN credential_previous_ok INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN credential_join_ok INTEGER NOT NULL DEFAULT 0;
