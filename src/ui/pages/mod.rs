//! One module per page, each with its handlers.

pub mod dead;
pub mod login;
pub mod mappings;
pub mod overview;
pub mod reconcile;
pub mod resource;
