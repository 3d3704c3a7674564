using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text.Json.Nodes;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// A fake Hugging Face hub on 127.0.0.1, served by a real HTTP server: the model-info API, the resolve endpoints
/// (LFS files redirect to a second host, the "CDN", with X-Linked-Etag/X-Linked-Size; small files answer directly with
/// an ETag), byte ranges, a gated repository that answers 401, and a CDN that can drop the connection midway.
/// </summary>
internal sealed class FakeHub : IDisposable
{
    public const string Commit = "0123456789abcdef0123456789abcdef01234567";
    private readonly HttpListener _api;
    private readonly HttpListener _cdn;
    private readonly Dictionary<string, byte[]> _files;
    private readonly HashSet<string> _dropped = [];
    private readonly CancellationTokenSource _stop = new();

    public FakeHub(string fixtureDir, string repo, string? gatedRepo = null, bool dropFirstDownload = false)
    {
        Repo = repo;
        GatedRepo = gatedRepo;
        DropFirstDownload = dropFirstDownload;
        _files = Directory.GetFiles(fixtureDir).Where(f => !f.EndsWith("reference.json", StringComparison.Ordinal))
            .ToDictionary(f => Path.GetFileName(f), File.ReadAllBytes);
        _files["README.md"] = "# not needed by the engine"u8.ToArray();
        (_api, ApiPort) = Listen();
        (_cdn, CdnPort) = Listen();
        _ = Serve(_api, HandleApi);
        _ = Serve(_cdn, HandleCdn);
    }

    public string Repo { get; }
    /// <summary>The commit the revision endpoint answers (a hostile hub may answer anything).</summary>
    public string CommitAnswer { get; set; } = Commit;
    /// <summary>Replaces the ETag the hub announces for a file, when set (a hostile hub).</summary>
    public Func<string, string>? EtagAnswer { get; set; }
    /// <summary>Files whose next download has one byte flipped (then served intact).</summary>
    public HashSet<string> CorruptOnce { get; } = [];
    /// <summary>Files whose next announced size is 10 bytes too large (then announced right).</summary>
    public HashSet<string> WrongSizeOnce { get; } = [];
    /// <summary>The CDN answers every range request with the whole file (200), as some servers do.</summary>
    public bool IgnoreRange { get; set; }
    public string? GatedRepo { get; }
    public bool DropFirstDownload { get; }
    public int ApiPort { get; }
    public int CdnPort { get; }
    public string Endpoint => $"http://127.0.0.1:{ApiPort}";
    public List<(string Host, string Method, string Path, bool Authorized, string? Range)> Requests { get; } = [];

    /// <summary>
    /// A started listener on a free loopback port. The port is free when asked, but another test running at the same
    /// time can take it before the listener starts (seen: "conflicts with an existing registration"): then another.
    /// </summary>
    private static (HttpListener Listener, int Port) Listen()
    {
        for (int attempt = 1; ; attempt++)
        {
            int port = FreePort();
            var listener = new HttpListener();
            listener.Prefixes.Add($"http://127.0.0.1:{port}/");
            try
            {
                listener.Start();
                return (listener, port);
            }
            catch (HttpListenerException) when (attempt < 20)
            {
                listener.Close();
            }
        }
    }

    private static int FreePort()
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    private async Task Serve(HttpListener listener, Action<HttpListenerContext> handle)
    {
        while (!_stop.IsCancellationRequested)
        {
            HttpListenerContext ctx;
            try { ctx = await listener.GetContextAsync(); }
            catch { return; }
            lock (Requests)
                Requests.Add((listener == _api ? "api" : "cdn", ctx.Request.HttpMethod, ctx.Request.Url!.AbsolutePath,
                    ctx.Request.Headers["Authorization"] is not null, ctx.Request.Headers["Range"]));
            _ = Task.Run(() =>
            {
                try { handle(ctx); }
                catch { try { ctx.Response.Abort(); } catch { } }
            });
        }
    }

    private static string Sha256(byte[] b) => Convert.ToHexStringLower(SHA256.HashData(b));
    private static bool IsLfs(string file) => file.EndsWith(".safetensors", StringComparison.Ordinal) || file.EndsWith(".model", StringComparison.Ordinal);

    private void HandleApi(HttpListenerContext ctx)
    {
        var path = Uri.UnescapeDataString(ctx.Request.Url!.AbsolutePath).Trim('/');
        var res = ctx.Response;
        string? repo = path.StartsWith("api/models/", StringComparison.Ordinal) ? string.Join('/', path.Split('/').Skip(2).Take(2)) : string.Join('/', path.Split('/').Take(2));
        if (repo == GatedRepo) { res.StatusCode = 401; res.Close(); return; }
        if (repo != Repo) { res.StatusCode = 404; res.Close(); return; }
        if (path.StartsWith("api/models/", StringComparison.Ordinal))
        {
            var json = new JsonObject
            {
                ["id"] = Repo, ["sha"] = CommitAnswer,
                ["siblings"] = new JsonArray(_files.Keys.Select(f => (JsonNode)new JsonObject { ["rfilename"] = f }).ToArray()),
            };
            Write(res, System.Text.Encoding.UTF8.GetBytes(json.ToJsonString()), ctx.Request.HttpMethod == "HEAD");
            return;
        }
        // {owner}/{name}/resolve/{rev}/{file}
        var parts = path.Split('/');
        var file = string.Join('/', parts.Skip(4));
        if (parts.Length < 5 || parts[2] != "resolve" || !_files.TryGetValue(file, out var bytes)) { res.StatusCode = 404; res.Close(); return; }
        res.Headers["X-Repo-Commit"] = Commit;
        if (IsLfs(file))
        {
            res.StatusCode = 302;
            res.Headers["X-Linked-Etag"] = $"\"{EtagAnswer?.Invoke(file) ?? Sha256(bytes)}\"";
            bool wrongSize;
            lock (WrongSizeOnce) wrongSize = ctx.Request.HttpMethod == "HEAD" && WrongSizeOnce.Remove(file);
            res.Headers["X-Linked-Size"] = (bytes.Length + (wrongSize ? 10 : 0)).ToString();
            res.Headers["Location"] = $"http://127.0.0.1:{CdnPort}/cdn/{file}";
            res.Close();
            return;
        }
        res.Headers["ETag"] = $"\"{EtagAnswer?.Invoke(file) ?? Sha256(bytes)[..40]}\"";
        Write(res, bytes, ctx.Request.HttpMethod == "HEAD");
    }

    private void HandleCdn(HttpListenerContext ctx)
    {
        var file = Uri.UnescapeDataString(ctx.Request.Url!.AbsolutePath)["/cdn/".Length..];
        var bytes = _files[file];
        var res = ctx.Response;
        long from = 0;
        bool corrupt;
        lock (CorruptOnce) corrupt = CorruptOnce.Remove(file);
        if (corrupt)
        {
            bytes = (byte[])bytes.Clone();
            bytes[bytes.Length / 3] ^= 0x40;
        }
        if (!IgnoreRange && ctx.Request.Headers["Range"] is string range && range.StartsWith("bytes=", StringComparison.Ordinal))
        {
            from = long.Parse(range["bytes=".Length..].Split('-')[0]);
            if (from >= bytes.Length)
            {
                res.StatusCode = 416;
                res.Close();
                return;
            }
            res.StatusCode = 206;
            res.Headers["Content-Range"] = $"bytes {from}-{bytes.Length - 1}/{bytes.Length}";
        }
        bool drop;
        lock (_dropped) drop = DropFirstDownload && from == 0 && bytes.Length > 4096 && _dropped.Add(file);
        res.ContentLength64 = bytes.Length - from;
        if (drop)
        {
            res.OutputStream.Write(bytes, 0, bytes.Length / 2);
            res.OutputStream.Flush();
            res.Abort(); // the connection drops midway
            return;
        }
        res.OutputStream.Write(bytes, (int)from, (int)(bytes.Length - from));
        res.Close();
    }

    private static void Write(HttpListenerResponse res, byte[] body, bool headOnly)
    {
        res.ContentLength64 = body.Length;
        if (!headOnly) res.OutputStream.Write(body);
        res.Close();
    }

    public void Dispose()
    {
        _stop.Cancel();
        _api.Close();
        _cdn.Close();
    }
}
