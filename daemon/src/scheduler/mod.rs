//! Scheduling requests of one model version onto its workers: the pure batching policy
//! ([`policy`]) and the driver that carries out its actions.

pub mod policy;
