//! The sidecar-injecting admission webhook: the HTTPS shell that reads AdmissionReviews, signs
//! certificates and answers (`webhook`), and the pure injection plan that turns a pod into a
//! JSON patch (`inject`).
//!
//! Depends on `identity` (certificates, Secret names) and `compute::snapshot` (container names).

pub mod inject;
pub mod webhook;
