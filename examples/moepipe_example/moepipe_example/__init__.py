"""A worked moepipe plug-in package (README: "Write your own placer").

    placer.name=moepipe_example.placers:greedy     (or placer.name=greedy once installed)
    workload.kind=moepipe_example.workloads:spike  (or workload.kind=spike)
"""
