//! A service's hyper-util clients (HTTP/2 services and health checks), one per worker thread
//! (`crate::per_worker`): a pooled connection is driven by the thread that sends on it.

use super::HttpClient;
use crate::per_worker::PerWorker;

pub(crate) type Clients = PerWorker<HttpClient>;
