//! capstan-proxy
