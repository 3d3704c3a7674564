using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace LocalVllm.Bench;

/// <summary>
/// Streaming HTTP/1.1 clients that cost this host as little as a client can: every connection is read by one thread
/// polling them all (no thread-pool continuation per received event, no HttpClient), each request on its own
/// connection (<c>Connection: close</c>), the response read to its end and parsed once. Stands in for clients on other
/// machines, which the same host cannot have: what the HTTP path then costs beyond in-process is mostly the server's.
/// </summary>
internal static class PolledHttpClients
{
    private sealed class Connection(int client, Socket socket, long start)
    {
        public readonly int Client = client;
        public readonly Socket Socket = socket;
        public readonly long Start = start;
        public readonly MemoryStream Received = new();
        public double TtftMs = -1;
    }

    /// <summary>
    /// Client c posts <paramref name="bodies"/>[c*waves .. c*waves+waves-1] to <paramref name="path"/> one after
    /// another; returns the completion tokens (from each stream's usage chunk), every request's time to its first body
    /// bytes, and the events that carried text.
    /// </summary>
    public static (long Tokens, List<double> TtftMs, long TextEvents, long Bytes) Run(IPEndPoint server, string path, IReadOnlyList<string> bodies, int waves)
    {
        int clients = bodies.Count / waves;
        var sent = new int[clients];
        var open = new List<Connection>();
        var ttfts = new List<double>();
        long tokens = 0, textEvents = 0, bytes = 0;
        void Send(int c)
        {
            var body = Encoding.UTF8.GetBytes(bodies[c * waves + sent[c]++]);
            var head = Encoding.ASCII.GetBytes($"POST /{path} HTTP/1.1\r\nHost: {server}\r\nContent-Type: application/json\r\nContent-Length: {body.Length}\r\nConnection: close\r\n\r\n");
            var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            long start = Stopwatch.GetTimestamp();
            socket.Connect(server);
            socket.Send([.. head, .. body]);
            open.Add(new Connection(c, socket, start));
        }
        for (int c = 0; c < clients; c++) Send(c);

        var buffer = new byte[1 << 16];
        var ready = new List<Socket>();
        while (open.Count > 0)
        {
            ready.Clear();
            foreach (var o in open) ready.Add(o.Socket);
            Socket.Select(ready, null, null, 1_000_000);
            foreach (var socket in ready)
            {
                var conn = open.First(o => o.Socket == socket);
                int n = socket.Receive(buffer);
                if (n > 0)
                {
                    // The first bytes of the body (the headers come with or before them): the first token's event.
                    conn.Received.Write(buffer, 0, n);
                    if (conn.TtftMs < 0 && BodyStart(conn.Received) is int b && b < conn.Received.Length)
                        conn.TtftMs = Stopwatch.GetElapsedTime(conn.Start).TotalMilliseconds;
                    continue;
                }
                open.Remove(conn);
                socket.Dispose();
                var (t, events) = Parse(conn.Received, path);
                tokens += t;
                textEvents += events;
                bytes += conn.Received.Length;
                ttfts.Add(conn.TtftMs);
                if (sent[conn.Client] < waves) Send(conn.Client);
            }
        }
        return (tokens, ttfts, textEvents, bytes);
    }

    private static int? BodyStart(MemoryStream received)
    {
        var span = received.GetBuffer().AsSpan(0, (int)received.Length);
        int i = span.IndexOf("\r\n\r\n"u8);
        return i < 0 ? null : i + 4;
    }

    /// <summary>Checks the status, joins the chunked body, and reads the usage chunk's completion tokens and the text events.</summary>
    private static (long Tokens, long TextEvents) Parse(MemoryStream received, string path)
    {
        var all = received.GetBuffer().AsSpan(0, (int)received.Length);
        int bodyStart = BodyStart(received) ?? throw new InvalidOperationException("The connection closed before the response's headers ended.");
        var headers = Encoding.ASCII.GetString(all[..bodyStart]);
        if (!headers.StartsWith("HTTP/1.1 200", StringComparison.Ordinal))
            throw new HttpRequestException($"{headers.Split("\r\n")[0]} from {path}: {Encoding.UTF8.GetString(all[bodyStart..])}");
        var body = new MemoryStream();
        var rest = all[bodyStart..];
        if (headers.Contains("Transfer-Encoding: chunked", StringComparison.OrdinalIgnoreCase))
            while (true)
            {
                int line = rest.IndexOf("\r\n"u8);
                int size = int.Parse(Encoding.ASCII.GetString(rest[..line]), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
                if (size == 0) break;
                body.Write(rest.Slice(line + 2, size));
                rest = rest[(line + 2 + size + 2)..];
            }
        else body.Write(rest);
        return ServeBench.ReadEvents(Encoding.UTF8.GetString(body.GetBuffer(), 0, (int)body.Length), path);
    }
}
