"""``transfiner bench``: load-test a running service over HTTP.

* ``client``: the HTTP client and the two load drivers. A closed loop keeps a fixed number of
  requests in flight (each user sends its next request when the previous answer arrives); an
  open loop sends on a Poisson clock at a target rate whatever the answers do, so queueing in
  the server shows in the latencies instead of slowing the clients down.
* ``metrics_delta``: the server-side view of one step, from two scrapes of ``/metrics``
  (queue wait, decode, inference, post-processing, batch sizes, rejections).
* ``report``: result dataclasses, ``report.json`` and ``report.md``.
* ``plots``: latency CDF, throughput and p99 against load, batch-size distribution (PNG).
* ``cli``: the sub-command's arguments and the sweep that ties the above together.
"""
