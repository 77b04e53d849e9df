//! Links, addresses and routes through rtnetlink (NETWORK.md §2.1).
//!
//! A [`Links`] wraps one rtnetlink connection, made in the namespace of the thread that
//! called [`Links::connect`]: the worker keeps one for the host, and the steps inside a
//! bunker's namespace open their own on a thread there ([`super::netns::run_in`] with a
//! current-thread runtime), since a netlink socket acts on the namespace it was made in.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;

use futures_util::TryStreamExt as _;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("open a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("{step} `{link}`")]
    Netlink {
        step: &'static str,
        link: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no link `{0}`")]
    Missing(String),
}

/// An rtnetlink connection in one namespace.
#[derive(Clone)]
pub struct Links {
    handle: Handle,
}

impl Links {
    /// Connects in the calling thread's namespace; the connection runs on the current
    /// tokio runtime.
    pub fn connect() -> Result<Self, LinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(LinkError::Connect)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    fn fail(step: &'static str, link: &str) -> impl FnOnce(rtnetlink::Error) -> LinkError {
        let link = link.to_owned();
        move |source| LinkError::Netlink { step, link, source }
    }

    /// The index of `name`, if it exists.
    pub async fn index(&self, name: &str) -> Result<Option<u32>, LinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(Some(link.header.index)),
            Ok(None) => Ok(None),
            // The kernel answers a lookup of a missing name with ENODEV.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
            Err(e) => Err(Self::fail("look up", name)(e)),
        }
    }

    async fn require(&self, name: &str) -> Result<u32, LinkError> {
        self.index(name)
            .await?
            .ok_or_else(|| LinkError::Missing(name.to_owned()))
    }

    /// The bridge `name`, up, unless a link of that name exists already (an operator's own
    /// bridge is used as it is).
    pub async fn ensure_bridge(&self, name: &str) -> Result<(), LinkError> {
        if self.index(name).await?.is_some() {
            return Ok(());
        }
        self.handle
            .link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await
            .map_err(Self::fail("add the bridge", name))
    }

    /// Makes `name` a port of the bridge `bridge`.
    pub async fn set_master(&self, name: &str, bridge: &str) -> Result<(), LinkError> {
        let index = self.require(name).await?;
        let master = self.require(bridge).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).controller(master).build())
            .execute()
            .await
            .map_err(Self::fail("put on the bridge", name))
    }

    /// A veth pair `name` ↔ `peer`, both down.
    pub async fn add_veth(&self, name: &str, peer: &str) -> Result<(), LinkError> {
        self.handle
            .link()
            .add(LinkVeth::new(name, peer).build())
            .execute()
            .await
            .map_err(Self::fail("add the veth", name))
    }

    /// Moves `name` into the namespace of the handle `netns`.
    pub async fn move_to(&self, name: &str, netns: RawFd) -> Result<(), LinkError> {
        let index = self.require(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).setns_by_fd(netns).build())
            .execute()
            .await
            .map_err(Self::fail("move into the bunker namespace", name))
    }

    pub async fn rename(&self, name: &str, to: &str) -> Result<(), LinkError> {
        let index = self.require(name).await?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .name(to.to_owned())
                    .build(),
            )
            .execute()
            .await
            .map_err(Self::fail("rename", name))
    }

    pub async fn set_mac(&self, name: &str, mac: [u8; 6]) -> Result<(), LinkError> {
        let index = self.require(name).await?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .address(mac.to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(Self::fail("set the address of", name))
    }

    pub async fn up(&self, name: &str) -> Result<(), LinkError> {
        let index = self.require(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(Self::fail("bring up", name))
    }

    pub async fn add_address(&self, name: &str, ip: Ipv4Addr, prefix: u8) -> Result<(), LinkError> {
        let index = self.require(name).await?;
        self.handle
            .address()
            .add(index, IpAddr::V4(ip), prefix)
            .execute()
            .await
            .map_err(Self::fail("add an address to", name))
    }

    /// The default route via `gateway`.
    pub async fn add_default_route(&self, gateway: Ipv4Addr) -> Result<(), LinkError> {
        self.handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gateway)
                    .build(),
            )
            .execute()
            .await
            .map_err(Self::fail(
                "add the default route via",
                &gateway.to_string(),
            ))
    }

    /// Deletes `name` (and a veth's peer with it); a missing link is fine.
    pub async fn delete(&self, name: &str) -> Result<(), LinkError> {
        let Some(index) = self.index(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(()),
            Err(e) => Err(Self::fail("delete", name)(e)),
        }
    }

    /// The names of all links.
    pub async fn names(&self) -> Result<Vec<String>, LinkError> {
        use rtnetlink::packet_route::link::LinkAttribute;
        let links: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(Self::fail("list", "*"))?;
        Ok(links
            .into_iter()
            .filter_map(|l| {
                l.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n),
                    _ => None,
                })
            })
            .collect())
    }

    /// Every IPv4 address of this namespace (the host's own, for the deny set).
    pub async fn ipv4_addresses(&self) -> Result<Vec<Ipv4Addr>, LinkError> {
        let addrs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(Self::fail("list addresses of", "*"))?;
        Ok(addrs
            .into_iter()
            .flat_map(|a| a.attributes)
            .filter_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip))
                | AddressAttribute::Local(IpAddr::V4(ip)) => Some(ip),
                _ => None,
            })
            .collect())
    }
}
