//! SMTP as state machines that do no I/O.
