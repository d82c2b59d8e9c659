//! edgecore (issue: "edgecore"): EdgeHub, MetaManager, MetaServer, Edged, DeviceTwin, EventBus,
//! ServiceBus.
//!
//! Not built yet: only the crate exists. EdgeHub will be a `transport::connect` link to the
//! cloud; MetaManager a `replication` store in RocksDB.
