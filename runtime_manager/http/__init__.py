"""The node's one HTTP client (`client`): calls to components, to the load
balancer and to peers."""
