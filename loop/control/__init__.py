"""Running and controlling the daemons from outside: service managers, sessions, commands."""
