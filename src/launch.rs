//! Local launcher.
