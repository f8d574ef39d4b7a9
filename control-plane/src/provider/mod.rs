//! Providers feed the store.
