-- A bunker with an exec running or a shell open is busy until `busy_until` (ms): the
-- controller serving that work pushes it forward while the work lasts, and the sweeper
-- neither ends nor passivates a busy bunker, whatever its idle timeout.
ALTER TABLE bunkers ADD COLUMN busy_until BIGINT;
