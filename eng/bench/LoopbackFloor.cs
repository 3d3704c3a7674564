using System.Diagnostics;
using System.Net;
using System.Net.Sockets;

namespace LocalVllm.Bench;

/// <summary>
/// The least CPU that carrying one streamed event from a server to a client on this same host can cost, with no HTTP,
/// no JSON and no thread hop on the sending side: one thread sends an event of the given size on each of N loopback TCP
/// connections per step (a blocking send, Nagle off) and sleeps about a millisecond (a stories260K step), while the
/// receiving side reads them either on one thread polling every connection (the cheapest client there is) or with one
/// pending asynchronous receive per connection on the thread pool (as HttpClient reads a stream). Reported: process CPU
/// per event above the same pacing loop with nothing sent. Whatever the server does on top of a send, and whatever a
/// real client does on top of a receive, only adds to this.
/// </summary>
internal static class LoopbackFloor
{
    public sealed record Floor(double SendOnlyUs, double SendAndPolledReceiveUs, double SendAndAsyncReceiveUs);

    public static Floor Measure(int connections, int steps, int eventBytes)
    {
        double idle = PerEvent(connections, steps, eventBytes, send: false, Receiver.None);
        double sendOnly = PerEvent(connections, Math.Min(steps, 256), eventBytes, send: true, Receiver.None) - idle; // unread: the socket buffers hold 256 steps
        double polled = PerEvent(connections, steps, eventBytes, send: true, Receiver.Polled) - idle;
        double async = PerEvent(connections, steps, eventBytes, send: true, Receiver.Async) - idle;
        return new Floor(sendOnly, polled, async);
    }

    private enum Receiver { None, Polled, Async }

    private static double PerEvent(int connections, int steps, int eventBytes, bool send, Receiver receiver)
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(connections);
        var senders = new Socket[connections];
        var receivers = new Socket[connections];
        for (int i = 0; i < connections; i++)
        {
            receivers[i] = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            receivers[i].Connect(listener.LocalEndPoint!);
            senders[i] = listener.Accept();
            senders[i].NoDelay = true;
        }
        try
        {
            long expected = send && receiver != Receiver.None ? (long)connections * steps * eventBytes : 0, received = 0;
            var reading = receiver switch
            {
                Receiver.Polled => Task.Factory.StartNew(() =>
                {
                    var buffer = new byte[1 << 16];
                    var ready = new List<Socket>(connections);
                    while (Interlocked.Read(ref received) < expected)
                    {
                        ready.Clear();
                        ready.AddRange(receivers);
                        Socket.Select(ready, null, null, 100_000);
                        foreach (var s in ready) Interlocked.Add(ref received, s.Receive(buffer));
                    }
                }, TaskCreationOptions.LongRunning),
                Receiver.Async => Task.WhenAll(receivers.Select(s => Task.Run(async () =>
                {
                    var buffer = new byte[1 << 16];
                    long mine = 0;
                    while (mine < (long)steps * eventBytes) mine += await s.ReceiveAsync(buffer, SocketFlags.None);
                }))),
                _ => Task.CompletedTask,
            };
            var data = new byte[eventBytes];
            Array.Fill(data, (byte)'x');
            var cpu0 = Process.GetCurrentProcess().TotalProcessorTime;
            for (int step = 0; step < steps; step++)
            {
                if (send)
                    foreach (var s in senders) s.Send(data);
                Thread.Sleep(1);
            }
            reading.Wait();
            var cpu = Process.GetCurrentProcess().TotalProcessorTime - cpu0;
            return cpu.TotalMicroseconds / ((double)connections * steps);
        }
        finally
        {
            foreach (var s in senders.Concat(receivers)) s.Dispose();
        }
    }
}
