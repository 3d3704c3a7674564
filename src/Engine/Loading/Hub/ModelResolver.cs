using System.Net;
using System.Net.Http.Headers;
using System.Security.Cryptography;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using LocalVllm.Engine.Text.Templating;

namespace LocalVllm.Engine.Loading.Hub;

/// <summary>
/// Turns <c>EngineOptions.Model</c> into a local directory: a directory is used as is; a hub repository id
/// (<c>owner/name</c>, optionally <c>@revision</c>) is looked up in the Hugging Face cache in its real layout
/// (<c>models--owner--name/refs/&lt;rev&gt;</c>, <c>snapshots/&lt;commit&gt;/</c>, <c>blobs/</c>), and missing files are
/// downloaded into that same layout, so Python tools and this engine share one cache. Downloads resume with HTTP
/// ranges, land atomically (a temporary file, then a rename), and are checked against the size and, for LFS files,
/// the sha256 the hub announces.
/// </summary>
public static partial class ModelResolver
{
    /// <summary>What a repository holds: a model (config, weights, tokenizer) or a PEFT LoRA adapter (its config and weights).</summary>
    private sealed record RepoKind(string What, string Marker, Func<string, bool> IsNeeded, Func<string, List<string>> Missing);

    private static readonly RepoKind ModelRepo = new("a transformers model repository", "config.json", IsNeeded, MissingFiles);
    private static readonly RepoKind AdapterRepo = new("a PEFT adapter repository", "adapter_config.json",
        file => file is "adapter_config.json" or "adapter_model.safetensors",
        dir => [.. new[] { "adapter_config.json", "adapter_model.safetensors" }.Where(f => !File.Exists(Path.Combine(dir, f)))]);

    /// <summary>Files the engine needs; others in the repository are not downloaded.</summary>
    private static bool IsNeeded(string file) =>
        file is "config.json" or "generation_config.json" or "model.safetensors.index.json" or "tokenizer.json" or "tokenizer_config.json"
            or "tokenizer.model" or "vocab.json" or "merges.txt" or "special_tokens_map.json" or "chat_template.jinja"
        || (file.EndsWith(".safetensors", StringComparison.Ordinal) && !file.Contains('/'));

    [GeneratedRegex(@"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    private static partial Regex RepoIdPattern();

    /// <summary>Whether <paramref name="model"/> looks like a hub repository id rather than a path.</summary>
    public static bool IsRepoId(string model)
    {
        var repo = model.Split('@')[0];
        return !Path.IsPathRooted(model) && !model.StartsWith('.') && RepoIdPattern().IsMatch(repo);
    }

    /// <summary>Returns a local directory holding <paramref name="model"/>, downloading what is missing.</summary>
    public static string Resolve(string model, HubOptions? options = null, CancellationToken cancellationToken = default) =>
        ResolveAsync(model, options, cancellationToken).GetAwaiter().GetResult();

    /// <inheritdoc cref="Resolve"/>
    public static Task<string> ResolveAsync(string model, HubOptions? options = null, CancellationToken cancellationToken = default) =>
        ResolveAsync(model, ModelRepo, options, cancellationToken);

    /// <summary>
    /// Returns a local directory holding the LoRA adapter <paramref name="adapter"/> (a folder, or a hub repository id
    /// whose adapter_config.json and adapter_model.safetensors are downloaded into the same cache as models).
    /// </summary>
    public static string ResolveAdapter(string adapter, HubOptions? options = null, CancellationToken cancellationToken = default) =>
        ResolveAsync(adapter, AdapterRepo, options, cancellationToken).GetAwaiter().GetResult();

    private static async Task<string> ResolveAsync(string model, RepoKind kind, HubOptions? options, CancellationToken cancellationToken)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(model);
        if (Directory.Exists(model)) return Path.GetFullPath(model);
        if (!IsRepoId(model))
            throw new DirectoryNotFoundException($"Model '{model}' is neither an existing directory nor a hub repository id (owner/name[@revision]).");
        options ??= new HubOptions();
        var parts = model.Split('@', 2);
        string repo = parts[0], revision = parts.Length > 1 ? parts[1] : "main";
        CheckRevision(repo, revision);
        string repoDir = Path.Combine(options.CacheDir, "models--" + repo.Replace("/", "--"));

        if (CachedSnapshot(repoDir, revision, kind) is string cached) return cached;
        if (options.Offline)
            throw new HubException(OfflineMessage(repo, revision, repoDir, MissingIn(repoDir, revision, kind)));

        using var http = new HttpClient(options.Handler ?? new SocketsHttpHandler { AllowAutoRedirect = false }, disposeHandler: options.Handler is null)
        {
            Timeout = Timeout.InfiniteTimeSpan,
        };
        try
        {
            return await DownloadAsync(http, repo, revision, repoDir, options, kind, cancellationToken).ConfigureAwait(false);
        }
        catch (HttpRequestException e) when (e.StatusCode is null)
        {
            throw new HubException(
                $"Could not reach {options.Endpoint} to download '{repo}' ({e.Message}). The cache searched was '{repoDir}'. " +
                $"Download it where there is network (e.g. `huggingface-cli download {repo}`) into that cache, or pass a local directory.", e);
        }
    }

    /// <summary>The snapshot directory for <paramref name="revision"/> if it is complete in the cache, else null.</summary>
    private static string? CachedSnapshot(string repoDir, string revision, RepoKind kind)
    {
        var commit = CommitFor(repoDir, revision);
        if (commit is null) return null;
        var snapshot = Path.Combine(repoDir, "snapshots", commit);
        return Directory.Exists(snapshot) && kind.Missing(snapshot).Count == 0 ? snapshot : null;
    }

    private static string? CommitFor(string repoDir, string revision)
    {
        if (CommitPattern().IsMatch(revision)) return revision;
        var refFile = Path.Combine(repoDir, "refs", revision);
        if (!File.Exists(refFile)) return null;
        var commit = File.ReadAllText(refFile).Trim();
        // A ref file that does not hold a commit id is not trusted as a path component: the revision is fetched again.
        return CommitPattern().IsMatch(commit) ? commit : null;
    }

    [GeneratedRegex("^[0-9a-f]{40}$")]
    private static partial Regex CommitPattern();

    [GeneratedRegex("^(?:[0-9a-f]{40}|[0-9a-f]{64})$")]
    private static partial Regex EtagPattern();

    [GeneratedRegex(@"^[A-Za-z0-9_.+-]+(?:/[A-Za-z0-9_.+-]+)*$")]
    private static partial Regex RevisionPattern();

    /// <summary>
    /// A revision becomes a path under <c>refs/</c>: branch and tag names and <c>refs/pr/N</c> are fine, a <c>..</c> or
    /// <c>.</c> segment, an absolute path or an odd character is refused.
    /// </summary>
    private static void CheckRevision(string repo, string revision)
    {
        if (!RevisionPattern().IsMatch(revision) || revision.Split('/').Any(segment => segment is "." or ".."))
            throw new HubException($"'{repo}@{revision}': the revision '{revision}' is not a valid branch, tag or commit name (no '..' or '.' segments, no leading '/', letters, digits and _ . + - / only).");
    }

    /// <summary>Throws unless <paramref name="path"/> lies inside <paramref name="repoDir"/>: nothing the hub answers may place a file elsewhere.</summary>
    private static string Inside(string repoDir, string path, string what)
    {
        var root = Path.GetFullPath(repoDir).TrimEnd(Path.DirectorySeparatorChar) + Path.DirectorySeparatorChar;
        var full = Path.GetFullPath(path);
        if (!full.StartsWith(root, StringComparison.Ordinal))
            throw new HubException($"Refusing to write {what} at '{full}': it is outside the repository's cache folder '{root}'.");
        return full;
    }

    /// <summary>What a snapshot lacks to be loadable: config, weights (and shards named in the index), a tokenizer.</summary>
    internal static List<string> MissingFiles(string dir)
    {
        var missing = new List<string>();
        if (!File.Exists(Path.Combine(dir, "config.json"))) missing.Add("config.json");
        var index = Path.Combine(dir, "model.safetensors.index.json");
        if (File.Exists(index))
        {
            var map = JsonNode.Parse(File.ReadAllText(index))?["weight_map"]?.AsObject();
            foreach (var shard in map?.Select(kv => kv.Value!.GetValue<string>()).Distinct() ?? [])
                if (!File.Exists(Path.Combine(dir, shard))) missing.Add(shard);
        }
        else if (!File.Exists(Path.Combine(dir, "model.safetensors"))) missing.Add("model.safetensors");
        bool tokenizer = File.Exists(Path.Combine(dir, "tokenizer.json")) || File.Exists(Path.Combine(dir, "tokenizer.model"))
            || (File.Exists(Path.Combine(dir, "vocab.json")) && File.Exists(Path.Combine(dir, "merges.txt")));
        if (!tokenizer) missing.Add("tokenizer.json (or tokenizer.model)");
        return missing;
    }

    private static List<string> MissingIn(string repoDir, string revision, RepoKind kind)
    {
        var commit = CommitFor(repoDir, revision);
        return commit is null ? [$"refs/{revision}"] : kind.Missing(Path.Combine(repoDir, "snapshots", commit));
    }

    private static string OfflineMessage(string repo, string revision, string repoDir, List<string> missing) =>
        $"Offline mode (HF_HUB_OFFLINE): '{repo}@{revision}' is not complete in the cache '{repoDir}'; missing: {string.Join(", ", missing)}. " +
        $"Download it first (e.g. `huggingface-cli download {repo}`), or unset HF_HUB_OFFLINE.";

    private static async Task<string> DownloadAsync(HttpClient http, string repo, string revision, string repoDir, HubOptions o, RepoKind kind, CancellationToken ct)
    {
        // The file list and the commit the revision points to.
        var info = await SendAsync(http, HttpMethod.Get, $"{o.Endpoint}/api/models/{repo}/revision/{Uri.EscapeDataString(revision)}", o, repo, revision, ct).ConfigureAwait(false);
        JsonNode json;
        using (info) json = JsonNode.Parse(await info.Content.ReadAsStringAsync(ct).ConfigureAwait(false))!;
        var commit = json["sha"]?.GetValue<string>() ?? throw new HubException($"The hub's answer for '{repo}@{revision}' has no commit sha.");
        if (!CommitPattern().IsMatch(commit))
            throw new HubException($"The hub's answer for '{repo}@{revision}' has an invalid commit sha '{commit}' (expected 40 hex digits); nothing was written.");
        var files = json["siblings"]!.AsArray().Select(s => s!["rfilename"]!.GetValue<string>()).Where(kind.IsNeeded).ToList();
        if (!files.Contains(kind.Marker)) throw new HubException($"'{repo}@{revision}' has no {kind.Marker}: it is not {kind.What}.");

        var snapshot = Inside(repoDir, Path.Combine(repoDir, "snapshots", commit), "a snapshot");
        Directory.CreateDirectory(snapshot);
        Directory.CreateDirectory(Path.Combine(repoDir, "blobs"));
        foreach (var file in files)
        {
            var target = Inside(repoDir, Path.Combine(snapshot, file), $"'{file}'");
            if (File.Exists(target)) continue;
            await DownloadFileAsync(http, repo, commit, file, repoDir, target, o, ct).ConfigureAwait(false);
        }
        Directory.CreateDirectory(Path.Combine(repoDir, "refs"));
        if (revision != commit)
        {
            var refFile = Inside(repoDir, Path.Combine(repoDir, "refs", revision), $"the ref of '{revision}'");
            Directory.CreateDirectory(Path.GetDirectoryName(refFile)!);
            await File.WriteAllTextAsync(refFile, commit, ct).ConfigureAwait(false);
        }
        var missing = kind.Missing(snapshot);
        if (missing.Count > 0) throw new HubException($"'{repo}@{revision}' lacks files the engine needs: {string.Join(", ", missing)}.");
        return snapshot;
    }

    private static async Task DownloadFileAsync(HttpClient http, string repo, string commit, string file, string repoDir, string target, HubOptions o, CancellationToken ct)
    {
        var url = $"{o.Endpoint}/{repo}/resolve/{commit}/{file}";
        // HEAD (no redirects followed) gives the blob's etag (sha256 for LFS files) and size.
        using var head = await SendAsync(http, HttpMethod.Head, url, o, repo, commit, ct, followRedirects: false).ConfigureAwait(false);
        string etag = (Header(head, "X-Linked-Etag") ?? head.Headers.ETag?.Tag ?? throw new HubException($"No ETag for '{file}' of '{repo}'.")).Trim('"').Replace("W/", "");
        if (!EtagPattern().IsMatch(etag))
            throw new HubException($"The hub's ETag for '{file}' of '{repo}' is '{etag}', not a 40- or 64-hex-digit blob id; nothing was written.");
        long? size = long.TryParse(Header(head, "X-Linked-Size"), out var ls) ? ls : head.Content.Headers.ContentLength;
        var blob = Inside(repoDir, Path.Combine(repoDir, "blobs", etag), $"the blob of '{file}'");
        if (!File.Exists(blob))
        {
            var partial = blob + ".incomplete";
            for (int attempt = 1; ; attempt++)
            {
                try
                {
                    await FetchAsync(http, url, partial, file, size, o, repo, commit, ct).ConfigureAwait(false);
                    break;
                }
                catch (Exception e) when (attempt < 5 && e is IOException or HttpRequestException { StatusCode: null })
                {
                    // The connection dropped: resume from what is on disk.
                    await Task.Delay(200 * attempt, ct).ConfigureAwait(false);
                }
                catch (IOException e)
                {
                    // Five tries and the bytes still do not add up to the size the hub announced (the size check).
                    throw new HubException($"'{file}' of '{repo}' could not be downloaded whole: {e.Message} The partial file is kept for the next try.", e);
                }
            }
            Verify(partial, file, size, etag);
            File.Move(partial, blob, overwrite: true);
        }
        Directory.CreateDirectory(Path.GetDirectoryName(target)!);
        var relative = Path.GetRelativePath(Path.GetDirectoryName(target)!, blob);
        try { File.CreateSymbolicLink(target, relative); }
        catch (IOException) { File.Copy(blob, target, overwrite: true); } // file systems without symlinks
    }

    private static async Task FetchAsync(HttpClient http, string url, string partial, string file, long? size, HubOptions o, string repo, string rev, CancellationToken ct)
    {
        long have = File.Exists(partial) ? new FileInfo(partial).Length : 0;
        if (size is long total && have >= total) return;
        using var response = await SendAsync(http, HttpMethod.Get, url, o, repo, rev, ct, rangeFrom: have).ConfigureAwait(false);
        if (have > 0 && response.StatusCode != HttpStatusCode.PartialContent) have = 0; // the server ignored the range: start over
        await using var output = new FileStream(partial, have > 0 ? FileMode.Append : FileMode.Create, FileAccess.Write, FileShare.None, 1 << 16, useAsync: true);
        await using var input = await response.Content.ReadAsStreamAsync(ct).ConfigureAwait(false);
        var buffer = new byte[1 << 16];
        var reporter = new ProgressReporter(file, size, have, o);
        int n;
        while ((n = await input.ReadAsync(buffer, ct).ConfigureAwait(false)) > 0)
        {
            await output.WriteAsync(buffer.AsMemory(0, n), ct).ConfigureAwait(false);
            have += n;
            reporter.Report(have);
        }
        reporter.Done(have);
        if (size is long expected && have != expected) throw new IOException($"'{file}': the connection ended after {have} of {expected} bytes.");
    }

    private static void Verify(string path, string file, long? size, string etag)
    {
        long actual = new FileInfo(path).Length;
        if (size is long s && actual != s)
        {
            File.Delete(path);
            throw new HubException($"'{file}' downloaded with {actual} bytes but the hub announced {s}; the partial file was removed, retry.");
        }
        if (Regex.IsMatch(etag, "^[0-9a-f]{64}$"))
        {
            using var stream = File.OpenRead(path);
            var sha = Convert.ToHexStringLower(SHA256.HashData(stream));
            if (sha != etag)
            {
                File.Delete(path);
                throw new HubException($"'{file}' failed its sha256 check (expected {etag}, got {sha}); the file was removed, retry.");
            }
        }
    }

    /// <summary>Sends a request, following redirects by hand so the token goes only to the hub endpoint.</summary>
    private static async Task<HttpResponseMessage> SendAsync(HttpClient http, HttpMethod method, string url, HubOptions o, string repo, string revision,
        CancellationToken ct, bool followRedirects = true, long rangeFrom = 0)
    {
        var endpointHost = new Uri(o.Endpoint).Authority;
        for (int hop = 0; hop < 10; hop++)
        {
            var request = new HttpRequestMessage(method, url);
            var uri = new Uri(url);
            if (o.Token is not null && uri.Authority == endpointHost)
                request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", o.Token);
            if (rangeFrom > 0) request.Headers.Range = new RangeHeaderValue(rangeFrom, null);
            request.Headers.UserAgent.ParseAdd("LocalVllm/1.0");
            var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, ct).ConfigureAwait(false);
            int code = (int)response.StatusCode;
            if (code is >= 300 and < 400 && response.Headers.Location is { } location)
            {
                if (!followRedirects) return response;
                url = new Uri(uri, location).ToString();
                response.Dispose();
                continue;
            }
            if (response.IsSuccessStatusCode) return response;
            response.Dispose();
            if (code == 416) // nothing past what is on disk: the file is shorter than the size the hub announced
                throw new IOException($"the server has no bytes from {rangeFrom} on ({url}).");
            throw code switch
            {
                401 or 403 => new HubException(
                    $"Access to '{repo}' was refused ({code}): the model is gated or private. Accept its licence at {o.Endpoint}/{repo} " +
                    "and set HF_TOKEN (or run `huggingface-cli login`, which writes the token file)."),
                404 => new HubException($"No such repository or revision on {o.Endpoint}: '{repo}@{revision}' (404)."),
                _ => new HubException($"The hub answered {code} for {url}."),
            };
        }
        throw new HubException($"Too many redirects fetching {url}.");
    }

    private static string? Header(HttpResponseMessage r, string name) =>
        r.Headers.TryGetValues(name, out var v) ? v.FirstOrDefault() : r.Content.Headers.TryGetValues(name, out var c) ? c.FirstOrDefault() : null;

    private sealed class ProgressReporter(string file, long? total, long start, HubOptions o)
    {
        private readonly DateTime _start = DateTime.UtcNow;
        private DateTime _last = DateTime.MinValue;
        private readonly bool _bar = o.ConsoleProgress && !Console.IsErrorRedirected;

        public void Report(long done)
        {
            var now = DateTime.UtcNow;
            if ((now - _last).TotalMilliseconds < 200) return;
            _last = now;
            Emit(done, final: false);
        }

        public void Done(long done) => Emit(done, final: true);

        private void Emit(long done, bool final)
        {
            double secs = Math.Max(1e-3, (DateTime.UtcNow - _start).TotalSeconds);
            var p = new DownloadProgress(file, done, total, (done - start) / secs);
            o.Progress?.Report(p);
            if (!o.ConsoleProgress) return;
            string pct = total is long t && t > 0 ? $"{100.0 * done / t,5:F1}%" : "";
            string eta = p.EtaSeconds is double e ? $" ETA {e:F0}s" : "";
            string line = $"{file}: {done / 1048576.0:F1}/{(total ?? 0) / 1048576.0:F1} MiB {pct} {p.BytesPerSecond / 1048576.0:F1} MiB/s{eta}";
            if (_bar) Console.Error.Write("\r" + line + (final ? Environment.NewLine : ""));
            else if (final) Console.Error.WriteLine(line);
        }
    }
}
