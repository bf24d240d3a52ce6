//! Counter engine behaviour through the proxy (issue: counters). Filled by the counters suite.
