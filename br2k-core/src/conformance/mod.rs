//! Conformance suites every backend runs against its real server.
