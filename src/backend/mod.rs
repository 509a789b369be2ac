//! Backends: the innermost service of a route's stack. Each kind (proxy, static response; later
//! aggregate, grpc, publish) is a tower `Service<Request<ReqBody>>`, so every layer applies to
//! every kind alike.

pub mod proxy;
pub mod respond;
