//! placeholder until the guest-driver core lands
