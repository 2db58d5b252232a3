//! What the in-process server tests share: starting a member on an ephemeral port.

use metastore_runtime::config::Config;
use metastore_runtime::RunningServer;
use tonic::transport::Channel;

/// Starts a member from `config` and connects a channel to its first client address.
pub async fn start(config: Config) -> (RunningServer, Channel) {
    let server = metastore_runtime::start(config)
        .await
        .expect("server starts");
    let url = format!("http://{}", server.client_addrs[0]);
    let channel = Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .expect("connects");
    (server, channel)
}
