"""Sign-in sessions: one state machine, persisted before it is acted on."""
